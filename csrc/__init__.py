"""C++ sources of the cpp backend (fastlora/backends/cpp.py compiles them on first use); shipped as package data."""
