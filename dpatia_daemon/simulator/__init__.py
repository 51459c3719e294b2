"""The SPS side, for tests, development and demos: an in-memory fake that grows into a simulator."""
