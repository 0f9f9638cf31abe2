//! What the host reads from a plugin's bytes before any engine sees them:
//! `ModuleInfo::parse` (validation, ABI version, imports, exports) and the
//! import resolution every backend links with (`function_imports`,
//! `resolve_imports`).
//!
//! The first byte picks the input: even, the rest as raw bytes; odd, a
//! module wasm-smith generates from the rest, shaped like a plugin: it
//! imports only host functions of one ABI version (bits 1-2 of the first
//! byte) and exports that version's marker, an allocator and the callbacks.
//! Such a module must parse, report that version and its exports, and link.
#![no_main]

use std::sync::OnceLock;

use arbitrary::{Arbitrary, Unstructured};
use libfuzzer_sys::fuzz_target;
use nasp_proxywasm::abi::host_functions;
use nasp_proxywasm::runtime::{FuncType, ValType, function_imports, resolve_imports};
use nasp_proxywasm::{AbiVersion, ModuleInfo};
use wasm_encoder::{
    CodeSection, EntityType, ExportKind, ExportSection, Function, FunctionSection, ImportSection,
    Module, TypeSection,
};

const VERSIONS: [(AbiVersion, &str); 3] = [
    (AbiVersion::V0_1_0, "proxy_abi_version_0_1_0"),
    (AbiVersion::V0_2_0, "proxy_abi_version_0_2_0"),
    (AbiVersion::V0_2_1, "proxy_abi_version_0_2_1"),
];

fn encoder_ty(t: ValType) -> wasm_encoder::ValType {
    match t {
        ValType::I32 => wasm_encoder::ValType::I32,
        ValType::I64 => wasm_encoder::ValType::I64,
        ValType::F32 => wasm_encoder::ValType::F32,
        ValType::F64 => wasm_encoder::ValType::F64,
    }
}

/// A module that imports every host function of `abi`: what wasm-smith may
/// choose imports from.
fn imports_module(abi: AbiVersion) -> Vec<u8> {
    let mut types = TypeSection::new();
    let mut imports = ImportSection::new();
    for (i, f) in host_functions(abi).iter().enumerate() {
        types.ty().function(
            f.ty.params.iter().map(|t| encoder_ty(*t)),
            f.ty.results.iter().map(|t| encoder_ty(*t)),
        );
        imports.import(f.module, f.name, EntityType::Function(i as u32));
    }
    let mut m = Module::new();
    m.section(&types).section(&imports);
    m.finish()
}

/// The exports of a plugin of `abi`, with their signatures.
fn plugin_exports(marker: &str) -> Vec<(&str, FuncType)> {
    use ValType::I32;
    vec![
        (marker, FuncType::new(&[], &[])),
        ("proxy_on_memory_allocate", FuncType::new(&[I32], &[I32])),
        ("proxy_on_context_create", FuncType::new(&[I32, I32], &[])),
        ("proxy_on_vm_start", FuncType::new(&[I32, I32], &[I32])),
        ("proxy_on_configure", FuncType::new(&[I32, I32], &[I32])),
        (
            "proxy_on_request_headers",
            FuncType::new(&[I32, I32, I32], &[I32]),
        ),
        ("proxy_on_done", FuncType::new(&[I32], &[I32])),
    ]
}

/// A module with exactly these exports (wasm-smith copies their names and
/// types; the bodies here are placeholders it does not use).
fn exports_module(exports: &[(&str, FuncType)]) -> Vec<u8> {
    let mut types = TypeSection::new();
    let mut funcs = FunctionSection::new();
    let mut section = ExportSection::new();
    let mut code = CodeSection::new();
    for (i, (name, ty)) in exports.iter().enumerate() {
        types.ty().function(
            ty.params.iter().map(|t| encoder_ty(*t)),
            ty.results.iter().map(|t| encoder_ty(*t)),
        );
        funcs.function(i as u32);
        section.export(name, ExportKind::Func, i as u32);
        let mut f = Function::new([]);
        f.instructions().unreachable().end();
        code.function(&f);
    }
    let mut m = Module::new();
    m.section(&types)
        .section(&funcs)
        .section(&section)
        .section(&code);
    m.finish()
}

struct Shape {
    imports: Vec<u8>,
    exports: Vec<u8>,
    expected: Vec<(&'static str, FuncType)>,
}

fn shapes() -> &'static [Shape] {
    static SHAPES: OnceLock<Vec<Shape>> = OnceLock::new();
    SHAPES.get_or_init(|| {
        VERSIONS
            .iter()
            .map(|(abi, marker)| {
                let expected = plugin_exports(marker);
                Shape {
                    imports: imports_module(*abi),
                    exports: exports_module(&expected),
                    expected,
                }
            })
            .collect()
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((mode, rest)) = data.split_first() else {
        return;
    };
    if mode & 1 == 0 {
        if let Ok(info) = ModuleInfo::parse(rest) {
            if let Ok(abi) = info.require_abi() {
                if let Ok(imports) = function_imports("fuzz", rest) {
                    let _ = resolve_imports("fuzz", &imports, &host_functions(abi));
                }
            }
        }
        return;
    }
    let v = usize::from(mode >> 1) % VERSIONS.len();
    let shape = &shapes()[v];
    let mut u = Unstructured::new(rest);
    let Ok(mut config) = wasm_smith::Config::arbitrary(&mut u) else {
        return;
    };
    config.available_imports = Some(shape.imports.clone());
    config.exports = Some(shape.exports.clone());
    config.module_shape = None;
    let Ok(module) = wasm_smith::Module::new(config, &mut u) else {
        return;
    };
    let wasm = module.to_bytes();
    // wasm-smith may use features the host's validator does not enable;
    // those are refused, which is right.
    let Ok(info) = ModuleInfo::parse(&wasm) else {
        return;
    };
    let abi = match info.require_abi() {
        Ok(abi) => abi,
        Err(e) => panic!("a module exporting {} has no ABI: {e}", shape.expected[0].0),
    };
    assert_eq!(abi, VERSIONS[v].0);
    for (name, ty) in &shape.expected {
        assert!(info.has_export(name, ty), "export {name}{ty} not found");
    }
    let imports = match function_imports("fuzz", &wasm) {
        Ok(i) => i,
        Err(e) => panic!("imports of host functions only were refused: {e}"),
    };
    if let Err(e) = resolve_imports("fuzz", &imports, &host_functions(abi)) {
        panic!("imports of {abi:?} host functions did not link: {e}");
    }
});
