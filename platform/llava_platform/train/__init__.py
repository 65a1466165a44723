"""Training building blocks: DeepSpeed configuration from a recipe stage (more arrive with Ray Train)."""
