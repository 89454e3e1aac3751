"""The trainer side: capturing training state into checkpoint memory and loading it back."""
