"""The Baichuan special token ids, defined once.

These are the ids of the released Baichuan 1 / Baichuan 2 ``tokenizer.model`` files, and the ids the
tokenizers trained here (``baichuan_jax.tokenizer.training``) put their special pieces at:

- ``<unk>`` = 0, also the padding id (Baichuan pads with 0; SentencePiece's own pad id is unset);
- ``<s>`` (BOS) = 1, ``</s>`` (EOS) = 2;
- ids 3..194 are reserved control pieces (``<reserved_3>`` .. ``<reserved_194>`` when trained here);
- the chat-turn markers: ``<user>`` = 195 before each user turn, ``<assistant>`` = 196 before each
  assistant turn (the released Baichuan 2 file names them ``<reserved_106>`` / ``<reserved_107>``).

The model config (``configs``), the chat template (``infer.chat_template``), the SFT renderer and
the tokenizer read them from here.
"""

PAD_ID = 0
BOS_ID = 1
EOS_ID = 2
USER_ID = 195
ASSISTANT_ID = 196
#: the first reserved control id; reserved ids are FIRST_RESERVED_ID .. USER_ID - 1.
FIRST_RESERVED_ID = 3
