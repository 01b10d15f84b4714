"""Fine-tuning a checkpoint: data formats (chat / prompt-completion / text), loss masks and packing (data.py,
packing.py); the Trainer does the loop."""
