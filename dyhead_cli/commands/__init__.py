"""One module per ``dyhead`` verb: parse what the CLI passed, call the engine, print (all rich output)."""
