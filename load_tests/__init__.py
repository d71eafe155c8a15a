"""An HTTP load harness and robustness suite for OpenAI-compatible servers (ours or any other).

`python -m load_tests --help` for the harness, `python -m load_tests.robustness --help` for the
bad-input, disconnect, overload and soak checks. Nothing here imports the engine.
"""
