"""Baichuan SentencePiece tokenizer for transformers (written by baichuan-jax).

Wraps the directory's `tokenizer.model` as the released Baichuan tokenizers do: no BOS/EOS added
unless `add_bos_token` / `add_eos_token` are set in tokenizer_config.json (both false for
Baichuan), `<unk>` = 0 (also the pad token), `<s>` = 1, `</s>` = 2. Like every transformers Python
tokenizer, it splits registered special-token strings (`<s>`, `</s>`, `<unk>`) out of the text
first, so typed `"</s>"` becomes id 2, and SentencePiece matches user-defined pieces (the
released Baichuan 2 model's 195/196) inside text. `baichuan_jax.tokenizer.Tokenizer` does
neither; use it where user text must not reach special ids.
"""

import os
import shutil
from typing import Optional

import sentencepiece as spm
from transformers import PreTrainedTokenizer


class BaichuanTokenizer(PreTrainedTokenizer):
  """SentencePiece tokenizer of the Baichuan models."""
  vocab_files_names = {"vocab_file": "tokenizer.model"}
  model_input_names = ["input_ids", "attention_mask"]

  def __init__(self, vocab_file, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
               pad_token="<unk>", add_bos_token=False, add_eos_token=False,
               sp_model_kwargs: Optional[dict] = None, clean_up_tokenization_spaces=False,
               **kwargs):
    self.vocab_file = vocab_file
    self.add_bos_token = add_bos_token
    self.add_eos_token = add_eos_token
    self.sp_model_kwargs = sp_model_kwargs or {}
    self.sp_model = spm.SentencePieceProcessor(**self.sp_model_kwargs)
    self.sp_model.Load(vocab_file)
    super().__init__(bos_token=bos_token, eos_token=eos_token, unk_token=unk_token,
                     pad_token=pad_token, add_bos_token=add_bos_token,
                     add_eos_token=add_eos_token, sp_model_kwargs=self.sp_model_kwargs,
                     clean_up_tokenization_spaces=clean_up_tokenization_spaces, **kwargs)

  @property
  def vocab_size(self) -> int:
    return self.sp_model.get_piece_size()

  def get_vocab(self) -> dict:
    vocab = {self.sp_model.id_to_piece(i): i for i in range(self.vocab_size)}
    vocab.update(self.added_tokens_encoder)
    return vocab

  def _tokenize(self, text, **kwargs):
    return self.sp_model.encode(text, out_type=str)

  def _convert_token_to_id(self, token):
    return self.sp_model.piece_to_id(token)

  def _convert_id_to_token(self, index):
    # A model's vocabulary may be padded past the tokenizer's: those ids decode to nothing.
    return self.sp_model.id_to_piece(index) if 0 <= index < self.vocab_size else ""

  def convert_tokens_to_string(self, tokens) -> str:
    out, run = [], []
    for t in tokens:
      if t in self.all_special_tokens:
        out.append(self.sp_model.decode(run) + t)
        run = []
      elif t:
        run.append(t)
    return "".join(out) + self.sp_model.decode(run)

  def build_inputs_with_special_tokens(self, token_ids_0, token_ids_1=None):
    bos = [self.bos_token_id] if self.add_bos_token else []
    eos = [self.eos_token_id] if self.add_eos_token else []
    out = bos + token_ids_0 + eos
    if token_ids_1 is not None:
      out += bos + token_ids_1 + eos
    return out

  def save_vocabulary(self, save_directory, filename_prefix: Optional[str] = None):
    if not os.path.isdir(save_directory):
      raise ValueError(f"save_vocabulary: {save_directory} is not a directory")
    name = (filename_prefix + "-" if filename_prefix else "") + "tokenizer.model"
    dst = os.path.join(save_directory, name)
    if os.path.abspath(self.vocab_file) != os.path.abspath(dst):
      shutil.copyfile(self.vocab_file, dst)
    return (dst,)


class BaiChuanTokenizer(BaichuanTokenizer):
  """Baichuan-7B's tokenizer class name."""
