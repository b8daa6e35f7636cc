"""The vitmerge inference server and command line."""
