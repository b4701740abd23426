"""The worker process: owns the models, pulls jobs from Redis, steps all searches together."""
