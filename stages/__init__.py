"""The eight stage kinds of a load, one module each; `conf/stages/<kind>/` chooses the implementation."""
