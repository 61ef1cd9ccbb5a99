"""Key layouts of single-file checkpoints: diffusers names -> original LDM/SGM names."""
