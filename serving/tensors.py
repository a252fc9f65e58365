"""numpy arrays <-> tensorflow.TensorProto with numpy alone (no TensorFlow runtime needed).

Outputs are written the way TF Serving writes them (`Tensor::AsProtoField`: strings in
`string_val`, numbers in the typed `*_val` field); inputs are read from either the typed fields
or `tensor_content`, with TensorFlow's rule that a shorter value list is padded with its last
value (a single value fills the whole tensor).
"""

from __future__ import annotations

import numpy as np

from serving.apis import tensor_pb2, tensor_shape_pb2, types_pb2

DT = types_pb2.DataType

# DataType -> (numpy dtype, TensorProto value field)
_TYPES: dict[int, tuple[np.dtype | type, str]] = {
    DT.DT_FLOAT: (np.float32, "float_val"),
    DT.DT_DOUBLE: (np.float64, "double_val"),
    DT.DT_HALF: (np.float16, "half_val"),
    DT.DT_INT8: (np.int8, "int_val"),
    DT.DT_INT16: (np.int16, "int_val"),
    DT.DT_INT32: (np.int32, "int_val"),
    DT.DT_INT64: (np.int64, "int64_val"),
    DT.DT_UINT8: (np.uint8, "int_val"),
    DT.DT_UINT16: (np.uint16, "int_val"),
    DT.DT_UINT32: (np.uint32, "uint32_val"),
    DT.DT_UINT64: (np.uint64, "uint64_val"),
    DT.DT_BOOL: (np.bool_, "bool_val"),
    DT.DT_STRING: (object, "string_val"),
}
_FROM_NUMPY = {np.dtype(t): dt for dt, (t, _) in _TYPES.items() if t is not object}


def dtype_name(dtype: int) -> str:
    """'string', 'float', 'int64'... for a DataType enum value, as TensorFlow names them."""
    name = DT.Name(dtype) if dtype in DT.values() else f"type {dtype}"
    return name.removeprefix("DT_").lower()


def numpy_dtype(dtype: int):
    """The numpy dtype for a DataType (object for strings); ValueError when unsupported."""
    if dtype not in _TYPES:
        raise ValueError(f"Unsupported tensor dtype {dtype_name(dtype)}.")
    return _TYPES[dtype][0]


def proto_shape(proto: tensor_pb2.TensorProto) -> tuple[int, ...]:
    """The shape of a TensorProto as a tuple (a scalar is ())."""
    return tuple(int(d.size) for d in proto.tensor_shape.dim)


def make_ndarray(proto: tensor_pb2.TensorProto) -> np.ndarray:
    """TensorProto -> numpy array (strings as an object array of bytes); ValueError if malformed."""
    shape = proto_shape(proto)
    if proto.tensor_shape.unknown_rank or any(d < 0 for d in shape):
        raise ValueError(f"Tensor shape {list(shape)} is not fully defined.")
    np_type, field = _TYPES.get(proto.dtype, (None, None))
    if np_type is None:
        raise ValueError(f"Unsupported tensor dtype {dtype_name(proto.dtype)}.")
    count = int(np.prod(shape, dtype=np.int64))
    if proto.tensor_content and proto.dtype != DT.DT_STRING:
        data = np.frombuffer(proto.tensor_content, dtype=np.dtype(np_type).newbyteorder("<"))
        if data.size != count:
            raise ValueError(f"Tensor content has {data.size} values but shape {list(shape)} needs {count}.")
        return data.astype(np_type).reshape(shape)
    values = list(getattr(proto, field))
    if proto.dtype == DT.DT_HALF:
        values = np.array(values, np.uint16).view(np.float16)
    if len(values) > count:
        raise ValueError(f"Tensor has {len(values)} values but shape {list(shape)} holds only {count}.")
    if count and not len(values):
        values = [b"" if np_type is object else 0] * count
    elif len(values) < count:
        values = list(values) + [values[-1]] * (count - len(values))  # TensorFlow pads with the last value
    array = np.empty(count, dtype=object) if np_type is object else np.asarray(values, dtype=np_type)
    if np_type is object:
        array[:] = values
    return array.reshape(shape)


def _shape_proto(shape: tuple[int, ...]) -> tensor_shape_pb2.TensorShapeProto:
    """A TensorShapeProto for a concrete shape."""
    return tensor_shape_pb2.TensorShapeProto(dim=[tensor_shape_pb2.TensorShapeProto.Dim(size=d) for d in shape])


def make_tensor_proto(values, dtype: int | None = None) -> tensor_pb2.TensorProto:
    """numpy array / nested list (bytes or str for strings) -> TensorProto, values in the typed field."""
    if dtype == DT.DT_STRING or (dtype is None and _is_text(values)):
        array = np.asarray(values, dtype=object)
        flat = [v.encode("utf-8") if isinstance(v, str) else bytes(v) for v in array.reshape(-1)]
        return tensor_pb2.TensorProto(dtype=DT.DT_STRING, tensor_shape=_shape_proto(array.shape), string_val=flat)
    array = np.asarray(values) if dtype is None else np.asarray(values, dtype=numpy_dtype(dtype))
    if dtype is None:
        if array.dtype not in _FROM_NUMPY:
            raise ValueError(f"No TensorFlow dtype for numpy {array.dtype}.")
        dtype = _FROM_NUMPY[array.dtype]
    proto = tensor_pb2.TensorProto(dtype=dtype, tensor_shape=_shape_proto(array.shape))
    flat = array.reshape(-1)
    if dtype == DT.DT_HALF:
        proto.half_val.extend(int(v) for v in flat.view(np.uint16))
    else:
        getattr(proto, _TYPES[dtype][1]).extend(flat.tolist())
    return proto


def _is_text(values) -> bool:
    """True for bytes/str data (a scalar, an object array or a nested list of them)."""
    if isinstance(values, (bytes, str)):
        return True
    if isinstance(values, np.ndarray):
        return values.dtype == object or values.dtype.kind in "SU"
    if isinstance(values, (list, tuple)):
        return bool(values) and _is_text(values[0])
    return False
