"""The offline `tiny` suite: generated tasks, word tokenizer, backbone recipe."""
