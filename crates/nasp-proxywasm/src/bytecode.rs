//! Reading a module's bytecode without an engine: ABI version, imports,
//! exports. Used for load-time checks and `nasp wasm inspect`.
//!
//! Never trusts the input: any malformed module is an error, not a panic.

use crate::runtime::{FuncType, ValType};
use crate::{Error, Result};

/// The proxy-wasm ABI versions this host implements.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum AbiVersion {
    /// `proxy_abi_version_0_1_0`.
    V0_1_0,
    /// `proxy_abi_version_0_2_0`.
    V0_2_0,
    /// `proxy_abi_version_0_2_1`.
    V0_2_1,
}

impl AbiVersion {
    /// The export that marks this version.
    pub fn marker(self) -> &'static str {
        match self {
            AbiVersion::V0_1_0 => "proxy_abi_version_0_1_0",
            AbiVersion::V0_2_0 => "proxy_abi_version_0_2_0",
            AbiVersion::V0_2_1 => "proxy_abi_version_0_2_1",
        }
    }

    /// `0.1.0`, `0.2.0` or `0.2.1`.
    pub fn as_str(self) -> &'static str {
        match self {
            AbiVersion::V0_1_0 => "0.1.0",
            AbiVersion::V0_2_0 => "0.2.0",
            AbiVersion::V0_2_1 => "0.2.1",
        }
    }

    fn from_marker(name: &str) -> Option<Self> {
        [AbiVersion::V0_1_0, AbiVersion::V0_2_0, AbiVersion::V0_2_1]
            .into_iter()
            .find(|v| v.marker() == name)
    }
}

/// What the host needs to know about a module before instantiating it.
#[derive(Clone, Debug, Default)]
pub struct ModuleInfo {
    /// The ABI version from the first `proxy_abi_version_*` function export.
    pub abi: Option<AbiVersion>,
    /// Marker exports that look like an ABI version this host does not know
    /// (for example vNEXT's `proxy_abi_version_0_x_x`).
    pub unknown_abi_markers: Vec<String>,
    /// Function imports: module, name, signature.
    pub imports: Vec<(String, String, FuncType)>,
    /// Imports of memories, tables or globals (unsupported).
    pub non_function_imports: Vec<(String, String)>,
    /// Function exports with their signatures.
    pub exports: Vec<(String, FuncType)>,
    /// Names of custom sections.
    pub custom_sections: Vec<String>,
}

fn val_type(t: wasmparser::ValType) -> Result<ValType> {
    Ok(match t {
        wasmparser::ValType::I32 => ValType::I32,
        wasmparser::ValType::I64 => ValType::I64,
        wasmparser::ValType::F32 => ValType::F32,
        wasmparser::ValType::F64 => ValType::F64,
        other => {
            return Err(Error::InvalidModule(format!(
                "value type {other} is not supported in host interfaces"
            )));
        }
    })
}

fn func_type(ft: &wasmparser::FuncType) -> Result<FuncType> {
    Ok(FuncType {
        params: ft
            .params()
            .iter()
            .map(|t| val_type(*t))
            .collect::<Result<_>>()?,
        results: ft
            .results()
            .iter()
            .map(|t| val_type(*t))
            .collect::<Result<_>>()?,
    })
}

impl ModuleInfo {
    /// Parses and validates a module.
    pub fn parse(wasm: &[u8]) -> Result<Self> {
        use wasmparser::{Parser, Payload, TypeRef};
        let mut validator = wasmparser::Validator::new();
        validator.validate_all(wasm).map_err(|e| {
            Error::InvalidModule(format!("failed to parse corrupted Wasm module: {e}"))
        })?;

        let mut info = ModuleInfo::default();
        // Types are only usable as function signatures if they are plain
        // numeric functions; others are recorded as None and rejected if used.
        let mut types: Vec<Option<wasmparser::FuncType>> = Vec::new();
        let mut func_types: Vec<u32> = Vec::new();
        let mut exports: Vec<(String, u32)> = Vec::new();
        for payload in Parser::new(0).parse_all(wasm) {
            let payload = payload.map_err(|e| Error::InvalidModule(e.to_string()))?;
            match payload {
                Payload::TypeSection(reader) => {
                    // One entry per type index: a recursion group of n
                    // types holds n indices (counting it as one shifted
                    // every later index, so an export typed after such a
                    // group was not seen). A function type is a signature
                    // whether or not it is final or has a supertype.
                    for rec in reader {
                        let rec = rec.map_err(|e| Error::InvalidModule(e.to_string()))?;
                        for sub in rec.into_types() {
                            types.push(match sub.composite_type.inner {
                                wasmparser::CompositeInnerType::Func(f) => Some(f),
                                _ => None,
                            });
                        }
                    }
                }
                Payload::ImportSection(reader) => {
                    for import in reader.into_iter() {
                        let import = import.map_err(|e| Error::InvalidModule(e.to_string()))?;
                        match import.ty {
                            TypeRef::Func(idx) => {
                                func_types.push(idx);
                                let ty = types
                                    .get(idx as usize)
                                    .and_then(|t| t.as_ref())
                                    .ok_or_else(|| {
                                        Error::InvalidModule(format!(
                                            "import {}.{} has an unsupported type",
                                            import.module, import.name
                                        ))
                                    })?;
                                info.imports.push((
                                    import.module.to_string(),
                                    import.name.to_string(),
                                    func_type(ty)?,
                                ));
                            }
                            _ => info
                                .non_function_imports
                                .push((import.module.to_string(), import.name.to_string())),
                        }
                    }
                }
                Payload::FunctionSection(reader) => {
                    for idx in reader {
                        func_types.push(idx.map_err(|e| Error::InvalidModule(e.to_string()))?);
                    }
                }
                Payload::ExportSection(reader) => {
                    for export in reader {
                        let export = export.map_err(|e| Error::InvalidModule(e.to_string()))?;
                        if export.kind == wasmparser::ExternalKind::Func {
                            exports.push((export.name.to_string(), export.index));
                        }
                    }
                }
                Payload::CustomSection(reader) => {
                    info.custom_sections.push(reader.name().to_string())
                }
                _ => {}
            }
        }
        for (name, index) in exports {
            let ty = func_types
                .get(index as usize)
                .and_then(|t| types.get(*t as usize))
                .and_then(|t| t.as_ref())
                .map(func_type)
                .transpose()
                .ok()
                .flatten();
            if info.abi.is_none() {
                if let Some(v) = AbiVersion::from_marker(&name) {
                    info.abi = Some(v);
                } else if name.starts_with("proxy_abi_version_") {
                    info.unknown_abi_markers.push(name.clone());
                }
            }
            if let Some(ty) = ty {
                info.exports.push((name, ty));
            }
        }
        Ok(info)
    }

    /// The ABI version, or the load error a user should see.
    pub fn require_abi(&self) -> Result<AbiVersion> {
        self.abi.ok_or_else(|| {
            if self.unknown_abi_markers.is_empty() {
                Error::UnknownAbi("missing Proxy-Wasm ABI version: the module exports no proxy_abi_version_* function".into())
            } else {
                Error::UnknownAbi(format!(
                    "unknown Proxy-Wasm ABI version {}: this host supports 0.1.0, 0.2.0 and 0.2.1",
                    self.unknown_abi_markers.join(", ")
                ))
            }
        })
    }

    /// Whether the module exports a function with this name and signature.
    pub fn has_export(&self, name: &str, ty: &FuncType) -> bool {
        self.exports.iter().any(|(n, t)| n == name && t == ty)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exports_typed_after_a_recursion_group_are_seen() {
        // Found by the module_info fuzz target: a group of two types is two
        // type indices.
        let wasm = wat::parse_str(
            r#"(module
                (rec (type (func (param i32))) (type (func (param i64))))
                (type $t (sub (func)))
                (func (export "proxy_abi_version_0_2_1") (type $t))
                (func (export "f") (type 1) (param i64)))"#,
        )
        .unwrap();
        let info = ModuleInfo::parse(&wasm).unwrap();
        assert_eq!(info.abi, Some(AbiVersion::V0_2_1));
        let unit = FuncType {
            params: vec![],
            results: vec![],
        };
        assert!(info.has_export("proxy_abi_version_0_2_1", &unit));
        let f = FuncType {
            params: vec![ValType::I64],
            results: vec![],
        };
        assert!(info.has_export("f", &f));
    }

    #[test]
    fn detects_versions_and_rejects_unknown() {
        let wasm = wat::parse_str(r#"(module (func (export "proxy_abi_version_0_2_1")) (func (export "proxy_abi_version_0_1_0")))"#).unwrap();
        assert_eq!(
            ModuleInfo::parse(&wasm).unwrap().abi,
            Some(AbiVersion::V0_2_1)
        );
        let wasm = wat::parse_str(r#"(module (func (export "proxy_abi_version_0_x_x")))"#).unwrap();
        let err = ModuleInfo::parse(&wasm)
            .unwrap()
            .require_abi()
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("unknown Proxy-Wasm ABI version proxy_abi_version_0_x_x"),
            "{err}"
        );
        let wasm = wat::parse_str(r#"(module)"#).unwrap();
        let err = ModuleInfo::parse(&wasm)
            .unwrap()
            .require_abi()
            .unwrap_err()
            .to_string();
        assert!(err.contains("missing Proxy-Wasm ABI version"), "{err}");
    }

    #[test]
    fn corrupt_module_is_an_error() {
        for bad in [
            &b""[..],
            b"\0asm",
            b"\0asm\x01\0\0\0\x07\xff\xff",
            b"not wasm at all",
        ] {
            let err = ModuleInfo::parse(bad).unwrap_err().to_string();
            assert!(err.contains("corrupted"), "{err}");
        }
    }
}
