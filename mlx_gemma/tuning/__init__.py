"""LoRA fine-tuning: the dataset reader (data.py), the adapter layers and the trainer."""
