"""fastllm.train: run config, optimizer and schedule, AMP loss scaling, checkpoints, logging and the trainer."""
