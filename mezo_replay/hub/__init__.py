"""The Hugging Face Hub: fetching bases and trajectories (hf:// references) and publishing runs with cards."""
