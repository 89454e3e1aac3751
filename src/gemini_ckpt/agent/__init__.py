"""The machine agent: owns checkpoint memory, serves its trainers, runs and restarts them."""
