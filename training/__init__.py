"""Bottom layer: data contracts, generators and loaders, models, metrics and policy rules,
plus the Ray Train loops; nothing here imports Ray Serve."""
