//! PROXY protocol v1/v2 header parser (placeholder: being written).

#![forbid(unsafe_code)]
