"""The flanneld daemon: its command line, start-up, the overlay loop and its events, health,
metrics, signals, the config monitor and the systemd unit it installs.
"""
