"""nn.Modules only, no file I/O: backbone -> FPN -> DyHead -> head, and the factory in build.py."""
