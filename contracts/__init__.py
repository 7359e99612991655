"""What crosses a service boundary besides the gRPC API: published read contracts on a
service's store and the Python forms of the common/v1 messages.

Each module here names its owner. The owner's migrations must keep it true (a test compares
it with the migrated schema); the readers depend on it instead of on the owner's code.
"""
