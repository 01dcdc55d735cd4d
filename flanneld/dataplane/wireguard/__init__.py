"""WireGuard devices and peers, through generic netlink (kernel) or wireguard-go's UAPI socket.
"""
