"""Text: tokenization and Meta's chat format.

  tokenizer     the SentencePiece Tokenizer (Meta's BOS/EOS/pad rules), training a tokenizer on a corpus
  hf_tokenizer  export to a Hugging Face tokenizer directory
  chat_format   Meta's [INST] dialog format token for token (encode_dialog), loss masks for fine-tuning
"""
