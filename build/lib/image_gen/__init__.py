"""ImageNet one-step generator trainer on the shared drift core (drifting_policy.drift).

Models: dit (generator), mae (feature encoder), features (feature-space drift loss).
Trainer: data / vae (ImageFolder, SD-VAE latent cache), bank (class queues), guidance (training
CFG), loop (optimisation, DDP, checkpoints), train (entry points), sample, metrics, demo, cli.
"""
