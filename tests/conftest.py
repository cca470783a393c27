"""The test suite's pytest set-up: the kernel lab plugin (tests/lab_plugin.py) runs tests marked
`lab` where the kernel can do what they test. Its own tests are in test_lab.py ("the pytest
integration"), on copies of it."""

pytest_plugins = ("lab_plugin",)
