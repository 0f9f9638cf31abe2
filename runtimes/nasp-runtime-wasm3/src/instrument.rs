//! Rewrites a module before wasm3 sees it, to give wasm3 what it lacks:
//!
//! - **A CPU deadline.** wasm3 checks nothing inside a loop (its `m3_Yield`
//!   hook runs on calls only), so a `loop { }` would hold the thread forever.
//!   Every loop header gets a countdown on a new mutable global; when it
//!   reaches zero the loop calls the host import [`BUDGET_MODULE`].
//!   [`BUDGET_NAME`], which checks the deadline and the interrupt flag, traps
//!   if either has passed, and otherwise returns the next allowance
//!   ([`crate::LOOP_BUDGET`] iterations). Recursion without loops is bounded
//!   by wasm3's own value- and native-stack checks.
//! - **A memory cap.** wasm3 has no limiter callback; the defined memory's
//!   maximum is lowered to the cap, so `memory.grow` past it returns -1 as it
//!   does on the other runtimes. A module whose *initial* memory is over the
//!   cap is refused.
//!
//! The budget import is appended after the module's own imports, so every
//! defined function's index moves up by one; all references to functions
//! (calls, `ref.func`, exports, elements, start, names) are renumbered.

use wasm_encoder::reencode::{Error as ReencodeError, Reencode, utils};
use wasm_encoder::{
    CodeSection, GlobalSection, GlobalType, ImportSection, Instruction, MemoryType, Module,
    SectionId, TypeSection, ValType,
};

/// Module name of the injected budget import.
pub const BUDGET_MODULE: &str = "nasp:wasm3";
/// Field name of the injected budget import.
pub const BUDGET_NAME: &str = "loop_budget";

/// What the rewriting pass learnt and produced.
pub struct Instrumented {
    /// The rewritten module.
    pub wasm: Vec<u8>,
    /// Names of the exported functions (wasm3's lookup also finds internal
    /// functions by debug name; only exports may be called).
    pub exported_functions: Vec<String>,
}

#[derive(Default)]
struct Shape {
    imported_funcs: u32,
    imported_globals: u32,
    defined_globals: u32,
    types: u32,
    has_types: bool,
    has_imports: bool,
    has_globals: bool,
    exported_functions: Vec<String>,
}

fn shape(wasm: &[u8]) -> Result<Shape, wasmparser::BinaryReaderError> {
    let mut s = Shape::default();
    for payload in wasmparser::Parser::new(0).parse_all(wasm) {
        match payload? {
            wasmparser::Payload::TypeSection(r) => {
                s.has_types = true;
                for group in r {
                    s.types += group?.types().len() as u32;
                }
            }
            wasmparser::Payload::ImportSection(r) => {
                s.has_imports = true;
                for import in r {
                    match import?.ty {
                        wasmparser::TypeRef::Func(_) => s.imported_funcs += 1,
                        wasmparser::TypeRef::Global(_) => s.imported_globals += 1,
                        _ => {}
                    }
                }
            }
            wasmparser::Payload::GlobalSection(r) => {
                s.has_globals = true;
                s.defined_globals = r.count();
            }
            wasmparser::Payload::ExportSection(r) => {
                for export in r {
                    let export = export?;
                    if export.kind == wasmparser::ExternalKind::Func {
                        s.exported_functions.push(export.name.to_string());
                    }
                }
            }
            _ => {}
        }
    }
    Ok(s)
}

struct Rewriter {
    shape: Shape,
    max_pages: u64,
    budget_type: u32,
    budget_func: u32,
    budget_global: u32,
    added: [bool; 3],
    error: Option<String>,
}

impl Rewriter {
    fn add_type(&self, types: &mut TypeSection) {
        types.ty().function([], [ValType::I32]);
    }
    fn add_import(&self, imports: &mut ImportSection) {
        imports.import(
            BUDGET_MODULE,
            BUDGET_NAME,
            wasm_encoder::EntityType::Function(self.budget_type),
        );
    }
    fn add_global(&self, globals: &mut GlobalSection) {
        globals.global(
            GlobalType {
                val_type: ValType::I32,
                mutable: true,
                shared: false,
            },
            &wasm_encoder::ConstExpr::i32_const(0),
        );
    }
}

/// The order sections must appear in (custom sections excepted).
fn rank(id: SectionId) -> u8 {
    match id {
        SectionId::Type => 1,
        SectionId::Import => 2,
        SectionId::Function => 3,
        SectionId::Table => 4,
        SectionId::Memory => 5,
        SectionId::Tag => 6,
        SectionId::Global => 7,
        SectionId::Export => 8,
        SectionId::Start => 9,
        SectionId::Element => 10,
        SectionId::DataCount => 11,
        SectionId::Code => 12,
        SectionId::Data => 13,
        _ => 0,
    }
}

impl Reencode for Rewriter {
    type Error = std::convert::Infallible;

    fn function_index(&mut self, func: u32) -> Result<u32, ReencodeError<Self::Error>> {
        Ok(if func >= self.shape.imported_funcs {
            func + 1
        } else {
            func
        })
    }

    fn parse_type_section(
        &mut self,
        types: &mut TypeSection,
        section: wasmparser::TypeSectionReader<'_>,
    ) -> Result<(), ReencodeError<Self::Error>> {
        utils::parse_type_section(self, types, section)?;
        self.add_type(types);
        self.added[0] = true;
        Ok(())
    }

    fn parse_import_section(
        &mut self,
        imports: &mut ImportSection,
        section: wasmparser::ImportSectionReader<'_>,
    ) -> Result<(), ReencodeError<Self::Error>> {
        utils::parse_import_section(self, imports, section)?;
        self.add_import(imports);
        self.added[1] = true;
        Ok(())
    }

    fn parse_global_section(
        &mut self,
        globals: &mut GlobalSection,
        section: wasmparser::GlobalSectionReader<'_>,
    ) -> Result<(), ReencodeError<Self::Error>> {
        utils::parse_global_section(self, globals, section)?;
        self.add_global(globals);
        self.added[2] = true;
        Ok(())
    }

    fn memory_type(
        &mut self,
        memory: wasmparser::MemoryType,
    ) -> Result<MemoryType, ReencodeError<Self::Error>> {
        let mut ty = utils::memory_type(self, memory);
        if ty.minimum > self.max_pages && self.error.is_none() {
            self.error = Some(format!(
                "initial memory of {} pages is over the cap of {} pages",
                ty.minimum, self.max_pages
            ));
        }
        ty.maximum = Some(ty.maximum.map_or(self.max_pages, |m| m.min(self.max_pages)));
        Ok(ty)
    }

    fn intersperse_section_hook(
        &mut self,
        module: &mut Module,
        _after: Option<SectionId>,
        before: Option<SectionId>,
    ) -> Result<(), ReencodeError<Self::Error>> {
        // A module without one of the three sections the pass extends gets it
        // just before the first section that must follow it.
        let next = before.map(rank).unwrap_or(u8::MAX);
        if !self.shape.has_types && !self.added[0] && next > rank(SectionId::Type) {
            let mut types = TypeSection::new();
            self.add_type(&mut types);
            module.section(&types);
            self.added[0] = true;
        }
        if !self.shape.has_imports && !self.added[1] && next > rank(SectionId::Import) {
            let mut imports = ImportSection::new();
            self.add_import(&mut imports);
            module.section(&imports);
            self.added[1] = true;
        }
        if !self.shape.has_globals && !self.added[2] && next > rank(SectionId::Global) {
            let mut globals = GlobalSection::new();
            self.add_global(&mut globals);
            module.section(&globals);
            self.added[2] = true;
        }
        Ok(())
    }

    fn parse_function_body(
        &mut self,
        code: &mut CodeSection,
        func: wasmparser::FunctionBody<'_>,
    ) -> Result<(), ReencodeError<Self::Error>> {
        let mut f = self.new_function_with_parsed_locals(&func)?;
        let mut reader = func.get_operators_reader()?;
        while !reader.eof() {
            let instruction = self.parse_instruction(&mut reader)?;
            let is_loop = matches!(instruction, Instruction::Loop(_));
            f.instruction(&instruction);
            if is_loop {
                let g = self.budget_global;
                f.instruction(&Instruction::GlobalGet(g))
                    .instruction(&Instruction::I32Eqz)
                    .instruction(&Instruction::If(wasm_encoder::BlockType::Empty))
                    .instruction(&Instruction::Call(self.budget_func))
                    .instruction(&Instruction::GlobalSet(g))
                    .instruction(&Instruction::End)
                    .instruction(&Instruction::GlobalGet(g))
                    .instruction(&Instruction::I32Const(1))
                    .instruction(&Instruction::I32Sub)
                    .instruction(&Instruction::GlobalSet(g));
            }
        }
        code.function(&f);
        Ok(())
    }
}

/// Validates `wasm` and rewrites it for wasm3 with a memory cap of
/// `max_pages` 64 KiB pages.
pub fn instrument(wasm: &[u8], max_pages: u64) -> Result<Instrumented, String> {
    wasmparser::Validator::new()
        .validate_all(wasm)
        .map_err(|e| format!("invalid module: {e}"))?;
    let shape = shape(wasm).map_err(|e| format!("invalid module: {e}"))?;
    let exported_functions = shape.exported_functions.clone();
    let mut rewriter = Rewriter {
        budget_type: shape.types,
        budget_func: shape.imported_funcs,
        budget_global: shape.imported_globals + shape.defined_globals,
        shape,
        max_pages,
        added: [false; 3],
        error: None,
    };
    let mut module = Module::new();
    rewriter
        .parse_core_module(&mut module, wasmparser::Parser::new(0), wasm)
        .map_err(|e| format!("cannot instrument module: {e}"))?;
    if let Some(e) = rewriter.error {
        return Err(e);
    }
    let wasm = module.finish();
    // The rewritten module must itself be valid; anything else is a bug here.
    wasmparser::Validator::new()
        .validate_all(&wasm)
        .map_err(|e| format!("internal error: instrumented module is invalid: {e}"))?;
    Ok(Instrumented {
        wasm,
        exported_functions,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn imports_of(wasm: &[u8]) -> Vec<(String, String)> {
        let mut out = Vec::new();
        for p in wasmparser::Parser::new(0).parse_all(wasm) {
            if let Ok(wasmparser::Payload::ImportSection(r)) = p {
                for i in r.into_iter().flatten() {
                    out.push((i.module.to_string(), i.name.to_string()));
                }
            }
        }
        out
    }

    #[test]
    fn module_without_sections_gains_type_import_and_global() {
        let wasm = wat::parse_str(r#"(module (func (export "f") (loop (br 0))))"#).expect("wat");
        let out = instrument(&wasm, 16).expect("instrument");
        assert_eq!(
            imports_of(&out.wasm),
            vec![(BUDGET_MODULE.to_string(), BUDGET_NAME.to_string())]
        );
        assert_eq!(out.exported_functions, vec!["f".to_string()]);
    }

    #[test]
    fn function_references_are_renumbered() {
        // `f` calls `g` and exports it via a table: both must still point at
        // the right function after the import shifts defined functions by one.
        let wasm = wat::parse_str(
            r#"(module
                (import "env" "h" (func $h (param i32)))
                (global $g0 (mut i32) (i32.const 7))
                (table 1 funcref)
                (elem (i32.const 0) $g)
                (func $g (result i32) (global.get $g0))
                (func (export "f") (result i32) (call $g))
                (start $g_start)
                (func $g_start (call $h (i32.const 1))))"#,
        )
        .expect("wat");
        let out = instrument(&wasm, 16).expect("instrument");
        let imports = imports_of(&out.wasm);
        assert_eq!(imports.len(), 2);
        assert_eq!(imports[1].0, BUDGET_MODULE);
    }

    #[test]
    fn memory_is_capped_and_oversized_initial_memory_refused() {
        let wasm = wat::parse_str(r#"(module (memory 1))"#).expect("wat");
        let out = instrument(&wasm, 4).expect("instrument");
        let mut max = None;
        for p in wasmparser::Parser::new(0).parse_all(&out.wasm) {
            if let Ok(wasmparser::Payload::MemorySection(r)) = p {
                for m in r.into_iter().flatten() {
                    max = m.maximum;
                }
            }
        }
        assert_eq!(max, Some(4));
        let big = wat::parse_str(r#"(module (memory 10))"#).expect("wat");
        let err = instrument(&big, 4).err().expect("refused");
        assert!(err.contains("over the cap"), "{err}");
    }

    #[test]
    fn invalid_module_is_a_clear_error() {
        let err = instrument(b"\0asm\x01\0\0\0\x99", 4).err().expect("error");
        assert!(err.starts_with("invalid module"), "{err}");
    }
}
