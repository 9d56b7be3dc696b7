"""The numbers every backend must agree on: Philox bits, the noise they map to, the update rule, generated
initial values, and the numpy reference that transcribes spec/ and is the oracle for the kernels."""
