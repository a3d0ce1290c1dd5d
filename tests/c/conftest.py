"""pytest setup for the C tests: the marker that selects the slow valgrind runs."""


def pytest_configure(config):
    config.addinivalue_line("markers", "valgrind: runs a program under valgrind (slow)")
