"""The dead-letter queue: records, the queue and its index, fingerprints and filters,
replay, sealing and RabbitMQ's own dead-lettering.
"""
