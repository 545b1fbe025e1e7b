# boot.py of a DEparrow board: runs at every boot, before main.py. Kept to a message so that
# a board stuck in a bad configuration still reaches its REPL (Ctrl-C at main.py's prompt).
print("deparrow: booting; main.py starts the node (Ctrl-C stops it)")
