"""The local stack of ``pipeline up``: child processes, their supervisor, the embedded
broker server, the demo traffic and the banner.
"""
