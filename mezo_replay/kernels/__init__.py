"""Element passes over whole tensors (perturb, restore+update, replay) on the torch path, the compiled CPU
kernel and the Triton kernels; each gives the reference's bytes, so the backend is only a speed choice."""
