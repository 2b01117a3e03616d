"""The toy world: tiny SD- and FLUX-architecture models trained by our own code on rendered, captioned shapes, so
that the whole paper runs on a CPU in minutes. world.py is the place to start."""
