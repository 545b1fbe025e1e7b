# main.py of a DEparrow board: joins Wi-Fi (/wifi.json) and runs the node (/node.json) until
# Ctrl-C. The work is in deparrow_board (frozen into the firmware, or installed with mip);
# see docs/firmware.md.
import deparrow_board

status = deparrow_board.main(verbose=False)
if status:
    print("deparrow: the node did not start (see above); fix it, then press Ctrl-D to retry")
