"""What is on disk: the .mzt trajectory (reader, writer, repair, locks), fingerprints of bases and tensors,
and safetensors checkpoints read and written tensor by tensor. spec/format.md is this layer's contract."""
