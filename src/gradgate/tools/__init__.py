"""gradgate's tools: the command line, the demo, the benchmark harness and the models they use.

The library never imports this package; tools use the library like any user.
"""
