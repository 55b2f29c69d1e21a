"""Trained checkpoints out to inference engines: CTranslate2 (:mod:`.ct2`) and Hugging Face Marian (:mod:`.hf`)."""
