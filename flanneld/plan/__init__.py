"""Leases -> desired kernel state: the Backend contract (register/lookup by Backend.Type) and
the values a plan is made of (devices, addresses, neighbours, FDB entries, routes, WireGuard peers).
"""
