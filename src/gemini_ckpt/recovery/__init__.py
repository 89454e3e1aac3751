"""Recovery decisions: which step the job resumes from and where each rank's state comes from."""
