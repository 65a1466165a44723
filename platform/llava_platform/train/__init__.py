"""Training building blocks, Ray-free: DeepSpeed config, engine (build, step, save/load state), checkpoints, plans."""
