"""Hugging Face remote code written by this project into every `baichuan_jax.hf.save` export.

`configuration_baichuan.py`, `modeling_baichuan.py` and `tokenization_baichuan.py` are plain
torch / transformers files (the project's own implementation of the Baichuan formulas, not copies
of the released code). They are never imported by `baichuan_jax`; `hf.save` copies them next to
the weights and `config.json`'s `auto_map` points at them, so
`AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)` and
`AutoTokenizer.from_pretrained(DIR, trust_remote_code=True)` load the export.
"""

FILES = ("configuration_baichuan.py", "modeling_baichuan.py", "tokenization_baichuan.py")
