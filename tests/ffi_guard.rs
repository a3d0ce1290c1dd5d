//! The panic guard is the only way to write an exported body: every
//! `#[no_mangle]` function lives in src/ffi/ and its body starts with
//! `guard(` or `guard_or(`. (rustls-ffi's lesson: a guard each function must
//! remember is forgotten in about one function in twelve.)
use std::fs;
use std::path::Path;

fn rust_files(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    for e in fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// (file, function name, first statement of the body) for each exported fn.
fn exported(src: &Path) -> Vec<(String, String, String)> {
    let mut files = Vec::new();
    rust_files(src, &mut files);
    let mut found = Vec::new();
    for f in files {
        let text = fs::read_to_string(&f).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        for (i, l) in lines.iter().enumerate() {
            if l.trim() != "#[no_mangle]" {
                continue;
            }
            let sig_start = i + 1;
            let mut j = sig_start;
            while !lines[j].trim_end().ends_with('{') {
                j += 1;
            }
            let sig = lines[sig_start..=j].join(" ");
            let name = sig.split("fn ").nth(1).unwrap().split('(').next().unwrap().trim().to_string();
            let first = lines[j + 1..]
                .iter()
                .map(|l| l.trim())
                .find(|l| !l.is_empty() && !l.starts_with("//"))
                .unwrap();
            found.push((f.display().to_string(), name, first.to_string()));
        }
    }
    found
}

#[test]
fn every_exported_function_is_in_the_ffi_layer_and_starts_with_the_guard() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let all = exported(&root.join("src"));
    assert!(all.len() >= 20, "found only {} exported functions", all.len());
    for (file, name, first) in &all {
        assert!(file.contains("/src/ffi/"), "{name} is exported outside src/ffi/ ({file})");
        assert!(name.starts_with("tf_"), "{name} does not start with tf_");
        assert!(
            first.starts_with("guard(")
                || first.starts_with("guard_or(")
                || first.starts_with("super::guard_or("),
            "{name} in {file} does not start with the panic guard: `{first}`"
        );
    }
}

#[test]
fn every_function_in_the_header_is_exported_and_guarded() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let header = fs::read_to_string(root.join("include/tcpframe.h")).unwrap();
    let names: Vec<String> = exported(&root.join("src")).into_iter().map(|(_, n, _)| n).collect();
    for line in header.lines() {
        let decl = line.trim_end();
        if decl.ends_with(");") && !line.starts_with([' ', '*', '/', '#']) {
            let before_paren = &decl[..decl.find('(').unwrap()];
            let name: String = before_paren
                .chars()
                .rev()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
                .collect();
            assert!(name.starts_with("tf_"), "unexpected declaration `{decl}`");
            assert!(names.contains(&name), "{name} is declared in the header but not found as guarded");
        }
    }
}
