"""Fine-tuning building blocks for the recipes: arguments, data, model assembly, checkpoints."""
