"""A private descriptor pool for the protocols of other model servers (protos/serving/).

Client libraries such as tritonclient and tensorflow-serving-api register the same
message names (``inference.ModelInferRequest``, ``tensorflow.TensorProto``) in protobuf's
default pool; keeping ours apart lets both live in one process.
"""

from __future__ import annotations

from google.protobuf import descriptor_pb2, descriptor_pool, message, message_factory

from proxy.gen.serving_descriptors import FILE_DESCRIPTOR_SET

__all__ = ["POOL", "message_class", "service_descriptor"]

POOL = descriptor_pool.DescriptorPool()
for _file in descriptor_pb2.FileDescriptorSet.FromString(FILE_DESCRIPTOR_SET).file:
    POOL.Add(_file)


def message_class(full_name: str) -> type[message.Message]:
    """The message class of a full protobuf name from protos/serving/."""
    return message_factory.GetMessageClass(POOL.FindMessageTypeByName(full_name))


def service_descriptor(full_name: str) -> object:
    """The ServiceDescriptor of a service in protos/serving/ (e.g. for reflection)."""
    return POOL.FindServiceByName(full_name)
