"""The parts every renderer and method shares: the Taichi runtime, the autograd bridge, cameras, meshes,
rigid transforms and metrics. Importing this package initialises nothing."""
