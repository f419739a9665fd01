"""Training machinery shared by MAE pretraining and segmentation fine-tuning:
optimizer, mesh and sharding, the jitted step, Orbax checkpoints, metrics."""
