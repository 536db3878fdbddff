"""The `paper` suite: open_clip ViT-B/32, B/16, L/14, the paper's 8 datasets and fine-tuned checkpoints from local files.

`suite` assembles a Suite; `checkpoints` reads checkpoint files (safetensors, state dicts,
TorchScript, HF CLIP folders, LoRA adapters); `data` reads the datasets' folder layouts.
"""
from .suite import load_paper_suite, load_pretrained, model_spec, paper_datasets, select_tasks

__all__ = ["load_paper_suite", "load_pretrained", "model_spec", "paper_datasets", "select_tasks"]
