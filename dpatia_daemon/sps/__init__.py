"""Talking to the Sectra Pathology Server, in the daemon and in workers alike: the
client and its HTTP/TLS plumbing, callback and client-credential tokens, the one
result writer, and the result frames the pathologist sees."""
