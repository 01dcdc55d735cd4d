"""The only code that speaks etcd: options, the client (TLS, auth, retries, watch resumption,
compaction) and the pipelined unary calls flannelctl makes over its own HTTP/2 framing.
"""
