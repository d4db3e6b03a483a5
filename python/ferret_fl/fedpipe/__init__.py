"""FedPipe's pieces (arXiv 2404.06448): importance-chosen adapters, per-client resources, quantised bases.

- ``importance``: the rank-r gradient energy of every candidate weight matrix and the
  exact choice of layers and ranks under a parameter budget;
- ``planner``: client profiles (memory, speed) -> base precision, micro-batch, examples
  per step and adapter budget, from a measured memory model;
- ``quantize``: the frozen base in int8 / int4 (optimum-quanto);
- ``adapters``: peft LoRA at per-layer ranks, upload checks, the exact stacked
  aggregation and its reproducible merge.

``ferret_fl.algorithms.fedpipe`` puts them together as a server role and a client role.
"""
