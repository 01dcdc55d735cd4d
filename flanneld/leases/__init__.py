"""etcd keys -> our lease and peer events: the allocator, acquire/renew/reserve/release, the
listing and the watcher.
"""
